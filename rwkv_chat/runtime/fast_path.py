"""The fast inference path of an `RwkvModel`: packed projections, fused decode steps, parallel prefill.

What this module promises:
- `attach_fast_path(model)` attaches a `FastRunner` to a plain model (its `runner`), `detach_fast_path` takes it
  off; the model's forward/decode_batch then go through it.
- `FastRunner(model)` computes the same function as the model's plain path (`RwkvModel._read`), within the
  rounding of the model's weight dtype: `prefill(ids, state)` for one sequence and `decode(ids, state)` for
  one token of each of B sequences. States passed in are never changed; new ones are returned.
  `decode_into(ids, source, target)` is the decode step from the leading rows of a caller's state buffer into
  another's, in place (graphed on CUDA: the batcher's ring steps so).
- Packing shares memory with the model (packing.py): each layer's r/k/v(/g) projections become one [P*A, C]
  matrix and the channel-mix key/receptance one [F+C, C] matrix, and the model's own parameters are re-pointed
  to views of them, so the weights are held once. int8 models (kernels/quant.py) are packed the same way.
- Devices: on CUDA with Triton, a decode step is 4 fused Triton kernels + 4 weight-streaming products per
  layer, captured in CUDA graphs per batch size (cuda_graphs.py), and prompts are read in CUDA graphs too
  (prefill_graphs.py; their last piece padded where the architecture's scans pass padding: `read_padded`); on
  CUDA without Triton the PyTorch step is graphed; on CPU a step is one call into the C++ kernels
  (cpu_kernels.DecodeStack), whose products read the weights as stored (fp32 activations; the integer ones round
  them to int16 / int8 first), and the PyTorch step runs where they did not build.
  Prefill is a few large matrix products per layer plus the wkv recurrence: scans token by token in Triton
  (CUDA) or in the C++ kernels (CPU), else the chunked-parallel PyTorch forms of parallel_wkv.py. With Triton,
  a prompt's element-wise work between the products is a few one-pass kernels (token-shift mixes, gates with
  the residual) and bf16/fp16 GEMM results stay in their dtype where their reader widens them (relu² squares
  them exactly and rounds once, as before); on CPUs the C++ kernels do the same passes (token-shift mixes, gates,
  relu², RWKV-5's group norm) with the decode step's arithmetic.

It is the same for every architecture it packs: what differs (how a time mix is packed, its recurrence on each
backend) it asks the model's architecture (models/rwkv4.py, rwkv5.py); the others (RWKV-6/7) get the plain
prefill and a graphed decode step (plain_graphs.py) on GPUs, and on CPUs a C++ decode step a layer where their
architecture has one (cpu_decode.py: RWKV-6, 7). It knows nothing of text, files or sessions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_kernels, quant, triton_kernels
from ..models.layers import LAYER_NORM_EPS, Padding, relu_square_
from ..state import RwkvState
from .cpu_decode import CpuStepRunner, stack_ends
from .cuda_graphs import GraphedDecoder
from .packing import PackedLinear, pack_projections, project, project_channel_mix
from .plain_graphs import GraphedPlainRunner
from .prefill_graphs import GraphedPrefill

CUDA_WKV_CHUNK = 32
CPU_SEGMENT = 1024  # prefill tokens read through all layers at once (bounds activation memory)
CUDA_SEGMENT = 4096


# ----------------------------------------------------------------------------------------- packing

@dataclass
class LayerPack:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    att_mix: torch.Tensor  # [P, C]: r, k, v (, g)
    att: PackedLinear  # [P*A, C]
    out: PackedLinear  # [C, A]
    ffn_mix: torch.Tensor  # [2, C]: k, r
    ffn: PackedLinear  # [F + C, C]: key, receptance
    value: PackedLinear  # [C, F]
    decay: torch.Tensor  # as the architecture's kernels read it (TimeMixPack.decay)
    first: torch.Tensor  # u
    ln_x: tuple[torch.Tensor, torch.Tensor] | None = None  # GroupNorm of the heads, if any

    @property
    def decay_factor(self) -> torch.Tensor:  # w = exp(decay) for kernels that read the factor, cached
        if not hasattr(self, "_w"):
            self._w = torch.exp(self.decay).contiguous()
        return self._w


def cpu_layer_tensors(layer: LayerPack, architecture) -> list[torch.Tensor]:
    """A layer's tensors in the order the C++ RWKV-4/5 layer step reads them (empty tensors for absent ones)."""
    none = torch.empty(0)
    opt = lambda t: none if t is None else t  # noqa: E731
    ln_x_w, ln_x_b = layer.ln_x or (None, None)
    return [layer.ln1_w, layer.ln1_b, layer.ln2_w, layer.ln2_b, layer.att_mix, layer.att.weight,
            opt(layer.att.scale), layer.out.weight, opt(layer.out.scale), layer.ffn_mix, layer.ffn.weight,
            opt(layer.ffn.scale), architecture.cpu_decay(layer), layer.first, layer.value.weight,
            opt(layer.value.scale), opt(ln_x_w), opt(ln_x_b)]


def pack_layer(block: nn.Module, config) -> LayerPack:
    att, ffn = block.att, block.ffn
    c = config.n_embd
    time_mix = config.architecture.pack_time_mix(att, config)
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    return LayerPack(
        ln1_w=f32(block.ln1.weight), ln1_b=f32(block.ln1.bias), ln2_w=f32(block.ln2.weight),
        ln2_b=f32(block.ln2.bias),
        att_mix=torch.stack([f32(m).reshape(c) for m in time_mix.mixes]),
        att=pack_projections(time_mix.projections),
        out=pack_projections([att.output]),
        ffn_mix=torch.stack([f32(ffn.time_mix_k).reshape(c), f32(ffn.time_mix_r).reshape(c)]),
        ffn=pack_projections([ffn.key, ffn.receptance]),
        value=pack_projections([ffn.value]),
        decay=time_mix.decay, first=time_mix.first, ln_x=time_mix.ln_x,
    )


# ----------------------------------------------------------------------------------------- runner

class FastRunner:
    """Fast prefill and decode for one `RwkvModel` (see module docstring)."""

    def __init__(self, model: nn.Module, use_triton: bool | None = None, use_graphs: bool | None = None):
        self.config = model.config
        self.architecture = model.config.architecture
        self.device = model.device
        self.rescale_every = model.rescale_every
        head_dtype = model.head.weight.dtype
        self.int8 = head_dtype == torch.int8
        cpu_decode = (self.device.type == "cpu" and self.architecture.cpu_kernel_id is not None
                      and cpu_kernels.handles_dtype(head_dtype))
        # dtype the matrix inputs are rounded to: the weight dtype, or bf16 (CUDA) / fp32 (CPU) for int8; fp32
        # wherever the CPU kernels take the products (they read fp32 inputs)
        if cpu_decode:
            self.act_dtype = torch.float32
        elif self.int8:
            self.act_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.act_dtype = head_dtype
        self.emb = model.emb.weight
        self.ln0 = (model.ln0.weight.detach().float(), model.ln0.bias.detach().float())
        self.ln_out = (model.ln_out.weight.detach().float(), model.ln_out.bias.detach().float())
        self.layers = [pack_layer(block, self.config) for block in model.blocks]
        self.head = pack_projections([model.head])
        on_cuda = self.device.type == "cuda"
        heads_fit = not self.architecture.heads or triton_kernels.supports_head_size(self.config.head_size)
        self.use_triton = ((triton_kernels.usable(self.device) if use_triton is None else use_triton)
                           and self.architecture.triton_decode and heads_fit)
        self.use_graphs = on_cuda if use_graphs is None else (use_graphs and on_cuda)
        self.wkv_chunk = CUDA_WKV_CHUNK if on_cuda else self.architecture.cpu_wkv_chunk
        self.segment = CUDA_SEGMENT if on_cuda else CPU_SEGMENT
        self._graphs = GraphedDecoder(self._decode_step, self.empty_state, self.device) if self.use_graphs else None
        # the prefill's kernels: its wkv token by token and, where they have them, its gates in one pass (Triton on
        # GPUs, the C++ kernels on CPUs: the same signatures); else the chunked PyTorch forms of parallel_wkv. The
        # graphed prompts' last piece is padded where their scans pass padding (read_padded)
        self.prefill_kernels = triton_kernels if self.use_triton else cpu_kernels.kernels() if cpu_decode else None
        padded = (self.read_padded if self.architecture.prefill_wkv_reads_padding and self.prefill_kernels is not None
                  else None)
        self._prompt_graphs = (GraphedPrefill(self._prefill_last, self.empty_state, self.device, padded)
                               if self.use_graphs else None)
        # CPU: a decode step is one call into the C++ kernels, when they built (cpu_kernels.DecodeStack)
        self.cpu_layers = ([cpu_layer_tensors(layer, self.architecture) for layer in self.layers]
                           if cpu_decode else None)
        self.cpu_stack = None
        if cpu_decode:  # with the embedding, norms and head where the head streams: a step from ids to logits
            ends = stack_ends(self.emb, self.ln0, self.ln_out, *self.head.segment(0))
            self.cpu_stack = cpu_kernels.DecodeStack(self.cpu_layers, self.architecture.cpu_kernel_id,
                                                     self.layers[0].att.n_segments, ends=ends)

    # ------------------------------------------------------------------------------------- public
    def decode(self, ids: torch.Tensor, state: RwkvState) -> tuple[torch.Tensor, RwkvState]:
        """ids [B] long on the model's device -> (logits fp32 [B, V], new state)."""
        if self.use_graphs:
            return self._graphs(ids, state)
        return self._decode_step(ids.to(self.device), state.shift, state.wkv)

    def decode_into(self, ids: torch.Tensor, source: RwkvState, target: RwkvState) -> torch.Tensor:
        """The step of the first B = len(ids) rows of `source` written into the same rows of `target` (states of
        at least B rows, never the same tensors) -> logits fp32 [B, V]; replayed from graphs captured on these
        buffers where graphs run (cuda_graphs.GraphedDecoder.into)."""
        if self.use_graphs:
            return self._graphs.into(ids, source, target)
        rows = ids.shape[0]
        logits, _ = self._decode_step(ids.to(self.device), source.shift[:rows], source.wkv[:rows],
                                      out=target.leading(rows))
        return logits

    def empty_state(self, batch: int) -> RwkvState:
        shift = torch.zeros(batch, self.config.n_layer, 2, self.config.n_embd, device=self.device)
        return RwkvState(shift, self.architecture.empty_wkv(self.config, batch, self.device))

    def prefill(self, ids: torch.Tensor, state: RwkvState, all_logits: bool = False):
        """ids [T] long -> (logits fp32 [V] or [T, V], new state). Prompts replay CUDA graphs where graphs run
        (prefill_graphs.GraphedPrefill)."""
        if self._prompt_graphs is not None and not all_logits:
            return self._prompt_graphs(ids, state)
        return self._prefill(ids, state, all_logits)

    def _prefill_last(self, ids: torch.Tensor, state: RwkvState):
        return self._prefill(ids, state)

    def read_padded(self, ids: torch.Tensor, state: RwkvState, valid: torch.Tensor):
        """A prompt padded at its end (RwkvModel.read_padded's contract: the first `valid` of ids [T], T <= the
        prefill's segment) -> (logits fp32 [V] after its last token, the state after it), where the architecture's
        prefill_wkv passes padding with this runner's scans (`Architecture.prefill_wkv_reads_padding`); no host
        sync."""
        if not (self.architecture.prefill_wkv_reads_padding and self.prefill_kernels is not None):
            raise ValueError(f"{self.architecture.family} prompts cannot be read padded here (no token-by-token scans)")
        if not 1 <= ids.numel() <= self.segment:
            raise ValueError(f"a padded read takes 1 to {self.segment} tokens, got {ids.numel()}")
        padding = Padding.of(ids.numel(), valid.to(self.device).reshape(1))
        hidden, state = self._prefill_segment(ids.to(self.device), state, padding=padding)
        return self._logits(hidden.index_select(0, padding.last))[0], state

    def _prefill(self, ids: torch.Tensor, state: RwkvState, all_logits: bool = False):
        outputs = []
        for start in range(0, ids.numel(), self.segment):
            hidden, state = self._prefill_segment(ids[start:start + self.segment], state, all_rows=all_logits)
            outputs.append(hidden if all_logits else hidden[-1:])
        hidden = torch.cat(outputs) if all_logits else outputs[-1]
        logits = self._logits(hidden)
        return (logits if all_logits else logits[0]), state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits of final hidden rows [T, C] (ln_out, then the head)."""
        return self.head(F.layer_norm(hidden, hidden.shape[-1:], *self.ln_out, LAYER_NORM_EPS))

    # ------------------------------------------------------------------------------------- decode
    def _decode_step(self, ids: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, out: RwkvState | None = None):
        """The whole decode step as a function of tensors (graph-capturable): returns (logits, RwkvState), the
        state written into `out` when given (tensors shaped like shift and wkv, not the same ones)."""
        if self.cpu_stack is not None and self.cpu_stack.whole and 0 < ids.numel() < quant.STREAM_ROWS:
            new_shift, new_wkv = ((torch.empty_like(shift), torch.empty_like(wkv)) if out is None
                                  else (out.shift, out.wkv))
            logits = self.cpu_stack.logits(ids.reshape(-1).to(torch.long).contiguous(), shift, wkv, new_shift,
                                           new_wkv, self.rescale_every)
            return logits, RwkvState(new_shift, new_wkv)
        x = F.embedding(ids, self.emb).float()
        x = F.layer_norm(x, x.shape[-1:], *self.ln0, LAYER_NORM_EPS)
        new_shift, new_wkv = (torch.empty_like(shift), torch.empty_like(wkv)) if out is None else (out.shift, out.wkv)
        if self.use_triton:
            return self._decode_triton(x, shift, wkv, new_shift, new_wkv)
        if self.cpu_stack is not None:
            return self._decode_cpu(x, shift, wkv, new_shift, new_wkv)
        return self._decode_torch(x, shift, wkv, new_shift, new_wkv)

    def _decode_cpu(self, x, shift, wkv, new_shift, new_wkv):
        x = x.clone(memory_format=torch.contiguous_format)  # the layers write their outputs over it
        x = self.cpu_stack.step(x, shift, wkv, new_shift, new_wkv, self.rescale_every)
        x = F.layer_norm(x, x.shape[-1:], *self.ln_out, LAYER_NORM_EPS)
        return self.head.decode(x), RwkvState(new_shift, new_wkv)

    def _decode_torch(self, x, shift, wkv, new_shift, new_wkv):
        for i, layer in enumerate(self.layers):
            x = self._decode_layer_torch(layer, x, shift[:, i], wkv[:, i], new_shift[:, i], new_wkv[:, i])
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        x = F.layer_norm(x, x.shape[-1:], *self.ln_out, LAYER_NORM_EPS)
        return self.head(x), RwkvState(new_shift, new_wkv)

    def _decode_layer_torch(self, layer: LayerPack, x, shift, wkv, shift_out, wkv_out):
        xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b, LAYER_NORM_EPS)
        shift_out[:, 0] = xx
        prev = shift[:, 0]
        mixed = (xx * layer.att_mix[:, None] + prev * (1 - layer.att_mix[:, None])).to(self.act_dtype)  # [P, B, C]
        proj = [layer.att(mixed[i], i) for i in range(layer.att.n_segments)]  # fp32 [B, A] each
        out = self.architecture.decode_wkv(layer, proj, wkv, wkv_out)
        x = x + layer.out(out.to(self.act_dtype))
        xx = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b, LAYER_NORM_EPS)
        shift_out[:, 1] = xx
        prev = shift[:, 1]
        mixed = (xx * layer.ffn_mix[:, None] + prev * (1 - layer.ffn_mix[:, None])).to(self.act_dtype)  # [2, B, C]
        k = relu_square_(layer.ffn(mixed[0], 0))
        r = torch.sigmoid(layer.ffn(mixed[1], 1))
        return x + r * layer.value(k.to(self.act_dtype))

    # Triton: per layer ln_mix -> project(att) -> wkv -> project(out) -> ln_mix -> project(ffn) with relu² of the
    # key (inside the product for one row) -> project(value); the residual adds happen inside the next ln_mix,
    # which returns the residual.
    def _decode_triton(self, x, shift, wkv, new_shift, new_wkv):
        tk = triton_kernels
        batch, c = x.shape
        x = x.contiguous()
        layers = self.layers
        p_att = layers[0].att.n_segments
        mixed = torch.empty((p_att, batch, c), device=x.device, dtype=self.act_dtype)
        mixed2 = torch.empty((2, batch, c), device=x.device, dtype=self.act_dtype)
        x = tk.ln_mix(x, layers[0].ln1_w, layers[0].ln1_b, mixed, prev=shift[:, 0, 0], mix=layers[0].att_mix,
                      xx_out=new_shift[:, 0, 0])
        for i, layer in enumerate(layers):
            proj = project(mixed, layer.att)
            y = self.architecture.triton_decode_wkv(tk, layer, proj, wkv[:, i], new_wkv[:, i], self.act_dtype)
            (att_out,) = project(y.unsqueeze(0), layer.out)
            x = tk.ln_mix(x, layer.ln2_w, layer.ln2_b, mixed2, prev=shift[:, i, 1], mix=layer.ffn_mix,
                          xx_out=new_shift[:, i, 1], delta=att_out)
            hidden, (r_parts,) = project_channel_mix(mixed2, layer.ffn, self.act_dtype)
            (value,) = project(hidden.unsqueeze(0), layer.value)
            halve = bool(self.rescale_every) and (i + 1) % self.rescale_every == 0
            if i + 1 < len(layers):
                nxt = layers[i + 1]
                x = tk.ln_mix(x, nxt.ln1_w, nxt.ln1_b, mixed, prev=shift[:, i + 1, 0], mix=nxt.att_mix,
                              xx_out=new_shift[:, i + 1, 0], delta=value, gate=r_parts, halve=halve)
            else:
                tk.ln_mix(x, self.ln_out[0], self.ln_out[1], mixed[:1], delta=value, gate=r_parts, halve=halve)
        (logits,) = project(mixed[:1], self.head)
        logits = logits[0] if logits.shape[0] == 1 else logits.sum(0)
        return logits.float(), RwkvState(new_shift, new_wkv)

    # ------------------------------------------------------------------------------------- prefill
    def _prefill_segment(self, ids: torch.Tensor, state: RwkvState, all_rows: bool = True,
                         padding: Padding | None = None):
        """One sequence: ids [T] -> (final hidden fp32 before ln_out, new state). The hidden is [T, C], or
        with all_rows=False only its last rows (the last layer then skips what only other tokens need). padding:
        the tokens after padding.last leave the state as it is (all rows kept)."""
        x = F.embedding(ids, self.emb).float()
        x = F.layer_norm(x, x.shape[-1:], *self.ln0, LAYER_NORM_EPS)  # [T, C]
        shifts, wkvs = [], []
        for i, layer in enumerate(self.layers):
            last_rows = not all_rows and i == len(self.layers) - 1
            x, shift, wkv = self._prefill_layer(layer, x, state.shift[0, i], state.wkv[0, i], last_rows, padding)
            shifts.append(shift)
            wkvs.append(wkv)
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        return x, RwkvState(torch.stack(shifts).unsqueeze(0), torch.stack(wkvs).unsqueeze(0))

    def _mixed(self, xx, prev, mix):
        """Token-shift mixes of the projection inputs: xx [T, C], mix [P, C] -> [P, T, C] in the matrix dtype
        (on a CPU with the kernels built and fp32 inputs, their one pass: the same bits as the PyTorch form)."""
        if self.use_triton:
            return triton_kernels.shift_mix(xx, prev, mix, self.act_dtype)
        kernels = cpu_kernels.built_for(xx) if self.act_dtype == torch.float32 else None
        if kernels is not None:
            return kernels.shift_mixes(xx.float().contiguous(), prev.float().contiguous(), mix.float().contiguous())
        shifted = torch.cat([prev.unsqueeze(0), xx[:-1]])
        mix = mix[:, None]
        return (xx * mix + shifted * (1 - mix)).to(self.act_dtype)

    def _prefill_projections(self, mixed, lin: PackedLinear, widen: bool = True) -> list[torch.Tensor]:
        """[P, T, C] through each segment -> [T, N_i] per segment (one batched GEMM when it can), fp32, or with
        widen=False as a bf16/fp16 GEMM gave them."""
        one_product = lin.scale is None and lin.equal_segments and lin.n_segments > 1
        if one_product and not quant.widened_on_cpu(lin.weight):
            n = lin.bounds[1]
            out = torch.bmm(mixed.to(lin.weight.dtype), lin.weight.view(lin.n_segments, n, -1).transpose(1, 2))
            return list((out.float() if widen else out).unbind(0))
        return [lin(mixed[i], i, widen) for i in range(lin.n_segments)]

    def _prefill_layer(self, layer: LayerPack, x, shift, wkv, last_rows: bool = False,
                       padding: Padding | None = None):
        """One layer over x [T, C] -> (x, new shift, new wkv). last_rows: return x for the last two tokens
        only, and spend on the others only what the state needs (k and v; the channel mix of the last token
        needs the attention output of the one before it, through its token shift). padding (not with last_rows):
        the recurrence passes the tokens after padding.last, and the new shifts are taken there."""
        fused = self.use_triton  # element-wise passes in Triton kernels; GEMM results stay in their dtype
        xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b, LAYER_NORM_EPS)
        mixed = self._mixed(xx, shift[0], layer.att_mix)
        widen = not (fused and self.architecture.prefill_takes_gemm_dtype)
        if last_rows:  # the projections the recurrence reads for every token; the others for the last two
            every = self.architecture.projections_for_every_token
            proj = [layer.att(mixed[i] if i in every else mixed[i, -2:], i, widen)
                    for i in range(layer.att.n_segments)]
        else:
            proj = self._prefill_projections(mixed, layer.att, widen)
        kept = slice(-2, None) if last_rows else slice(None)  # the rows that go on past the wkv
        real = {} if padding is None else {"real": padding.real[0]}  # [T, 1]
        out, new_wkv = self.architecture.prefill_wkv(layer, proj, wkv, self.prefill_kernels, self.wkv_chunk, kept,
                                                     **real)
        x = x[kept] + layer.out(out.to(self.act_dtype), widen=not fused)  # fp32 + bf16 adds in fp32, one pass
        xx2 = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b, LAYER_NORM_EPS)
        mixed = self._mixed(xx2, shift[1], layer.ffn_mix)
        # relu² of a bf16/fp16 product in its own dtype: the exact square rounded once, as when widened first
        k = relu_square_(layer.ffn(mixed[0], 0, widen=not fused)).to(self.act_dtype)
        gate = getattr(self.prefill_kernels, "sigmoid_gate", None)  # Triton's or C++'s: one pass
        if fused:
            x = gate(layer.ffn(mixed[1], 1, widen=False), layer.value(k, widen=False), x)
        elif gate is not None:
            x = gate(layer.ffn(mixed[1], 1), layer.value(k), x)
        else:
            x = x + torch.sigmoid(layer.ffn(mixed[1], 1)) * layer.value(k)
        if padding is not None:
            return x, padding.at_last([xx, xx2], 0), new_wkv
        return x, torch.stack([xx[-1], xx2[-1]]), new_wkv


@torch.no_grad()
def attach_fast_path(model: nn.Module, **options) -> nn.Module:
    """Route `model`'s forward/decode_batch through a `FastRunner` (packed projections, fused kernels, CUDA
    graphs; the same function within the weight dtype's rounding). Call after the weights are final (loading,
    fp16 rescale, int8 quantisation); `options` go to FastRunner (use_triton, use_graphs). Returns the model.
    An architecture the runner does not pack (`Architecture.fast_runner` False) keeps the plain prefill, with its
    decode step (the fused one where it runs, unless use_triton=False) in CUDA graphs on a GPU
    (runtime.plain_graphs) unless use_graphs=False, and on a CPU its C++ decode step where it has one
    (runtime.cpu_decode)."""
    if model.config.architecture.fast_runner:
        model.runner = FastRunner(model, **options)
    elif model.device.type == "cuda" and options.get("use_graphs", True):
        model.runner = GraphedPlainRunner(model, use_triton=options.get("use_triton"))
    elif CpuStepRunner.runs(model):
        model.runner = CpuStepRunner(model)
    return model


def detach_fast_path(model: nn.Module) -> nn.Module:
    """Back to the model's plain reference path."""
    model.runner = None
    return model
