"""``python -m helpers`` is the same CLI as ``dhllm``."""

from helpers.cli import main

if __name__ == "__main__":
    main()
