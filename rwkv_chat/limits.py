"""Every user-facing limit and default of the chat, in one place (the UI's sliders read these too)."""

MAX_MESSAGE_CHARS = 16_000  # one user message, before tokenizing
MAX_MESSAGE_TOKENS = 4_096  # one user turn's prompt, after tokenizing
MAX_NEW_TOKENS = 2_048  # upper bound of the "max new tokens" setting
DEFAULT_NEW_TOKENS = 333
MAX_PREAMBLE_CHARS = 8_000
STATE_CACHE_BYTES = 1024 * 2**20  # prefix-state cache shared by all sessions of one model
MAX_TOP_K = 1_000
MAX_TEMPERATURE = 5.0
MAX_PENALTY = 2.0
MAX_UPLOAD_BYTES = 1024  # the app takes no files: Gradio's upload route refuses anything bigger
CACHE_CLEAN_S = 3600  # Gradio's temporary files are deleted this often, once this old (and at every start)
MAX_STOP_STRINGS = 4  # OpenAI's bound on `stop`
MAX_STOP_CHARS = 64
