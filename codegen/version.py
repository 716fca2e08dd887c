"""maskc's version: part of every generated kernel's header and cache key.

It lives here, in the first stage that needs it (generated files name it), and
`maskc.__version__` re-exports it, so no stage imports the facade for it.
"""

__version__ = "0.1.0"
