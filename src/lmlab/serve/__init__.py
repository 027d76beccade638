"""``lmlab serve``: an OpenAI-compatible HTTP server with continuous batching, and a playground.

``scheduler.py`` runs one decoding loop for every request (needs only torch);
``app.py`` holds the HTTP routes (needs the optional extra ``lmlab[serve]``:
fastapi and uvicorn); ``static/`` is the playground page.
"""
