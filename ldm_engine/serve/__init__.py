"""Serving: the ldm-serve Ray Serve app (A1111, OpenAI and jobs APIs) and its request/response layer."""
