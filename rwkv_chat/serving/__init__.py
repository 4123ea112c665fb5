"""HOW a chat is served, in token ids: the engine that owns a turn, immutable conversations (session), the
prefix-state cache, sampling with ChatRWKV's penalties, a reply's token loop (generation) and the batcher that
runs every concurrent chat's steps as one. Knows nothing of Gradio or HTTP.
"""
