"""Fetch and convert a named model into the local cache ahead of time (e.g. while building an image).

    python scripts/fetch_model.py [smollm2-135m]
"""
import sys

from jaxserve.checkpoint.registry import DEFAULT_MODEL, resolve_model

if __name__ == "__main__":
    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL))
