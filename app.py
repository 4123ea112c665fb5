"""Chat with RWKV-4 World and RWKV-5 World models in the browser (locally, on a Space, or via --share).

    python app.py                                  # RWKV-5 World 0.1B, on the GPU if there is one
    python app.py --model /path/to/model.pth --port 7860 --share

Flags and their environment variables are listed in rwkv_chat/app/config.py; the page lives in rwkv_chat/app/ui.py.
"""

from rwkv_chat.app.config import parse_config
from rwkv_chat.app.ui import build_app, launch

config = parse_config()
demo = build_app(config)

if __name__ == "__main__":
    launch(demo, config)
