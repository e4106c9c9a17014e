"""jaxserve: a JAX/XLA multi-backend LLM inference runtime."""
from jaxserve.errors import JaxServeError
from jaxserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "RequestOutput", "SamplingParams", "JaxServeError"]


def __getattr__(name):
    # LLM pulls in jax; import it lazily so `import jaxserve` stays cheap for tools that need less.
    if name in ("LLM", "RequestOutput"):
        from jaxserve import llm
        return getattr(llm, name)
    raise AttributeError(name)
