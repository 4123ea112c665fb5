"""Chat with RWKV models (RWKV-4/5/6/7 World, RWKV-7 G1) in the browser (locally, on a Space, or via --share).

    python app.py                                  # an RWKV-7 G1 model on a GPU, RWKV-5 World 0.1B on a CPU
    python app.py --model /path/to/model.pth --port 7860 --share
    python app.py --model "RWKV-7 G1 1.5B" --state cat=/path/to/cat-state.pth

Flags and their environment variables are listed in rwkv_chat/app/config.py; the page lives in rwkv_chat/app/ui.py.
"""

from rwkv_chat.app.config import parse_config
from rwkv_chat.app.ui import build_app_or_exit, serve

config = parse_config()
demo = build_app_or_exit(config)

if __name__ == "__main__":
    serve(demo, config)
