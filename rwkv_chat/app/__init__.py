"""WHAT the user sees: the Gradio page (ui), its gradio_client API (ui_api, ui_stream), per-session chat handling
(chat_service), the models the picker offers and holds (model_choices, model_pool, engine_factory) and the
app's flags (config). Holds no model math.
"""
