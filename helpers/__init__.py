"""dhllm: the LLM part of a Chinese digital-human assistant, step by step.

One helper package shared by all notebooks (in the spirit of d2l's ``d2l``): download models,
load them, chat with them, serve them over HTTP and call local or cloud LLMs the same way.
"""

__version__ = "0.1.0"
