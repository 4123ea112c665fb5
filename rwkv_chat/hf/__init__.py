"""HOW transformers sees these models: configurations (config), PreTrainedModel classes (model), the World
tokenizer (tokenizer), the Auto-class registration without remote code (register) and the converter
(convert: `python -m rwkv_chat.hf.convert`, `rwkv-chat-convert`).
"""
