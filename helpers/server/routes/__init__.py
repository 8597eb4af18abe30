"""The routes of both contracts: the chapter's ``POST /`` and OpenAI's ``/v1``."""
