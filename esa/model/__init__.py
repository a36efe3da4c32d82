"""Everything that touches the network: loading (hub, local, GGUF, embedded), device and dtype,
big-model placement, data parallelism, target discovery, introspection, forward passes
(token scoring, perplexity) and the residual stream (observed and written back by hooks on the
decoder blocks).

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.outdir (the tools' manifest).
"""
