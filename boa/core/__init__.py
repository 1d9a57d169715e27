"""What the LLM and CNN paths share, importing neither (no transformers, no attention statistics): the uniform
quantizer and grids, Hessians and damping, the packed layout, AdaRound's pieces, atomic io and fingerprints,
checkpoints, output folders, errors and input checks. Import the modules themselves (boa.core.quantizer, ...)."""
