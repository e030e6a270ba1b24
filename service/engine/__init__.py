"""Batching and the workers layout: the engine behind the HTTP layer, which it never imports.

``InferenceEngine`` (``protocol``) is what the API calls; ``Engine`` runs it in-process, ``RemoteEngine``
forwards to the engine process. Errors are ``errors``; the API maps them to statuses.
"""
