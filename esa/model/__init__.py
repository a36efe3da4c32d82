"""Everything that touches the network: loading (hub, local, GGUF, embedded), device and dtype,
big-model placement, data parallelism, target discovery, introspection and forward passes
(token scoring, perplexity).

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.outdir (the tools' manifest).
"""
