"""The bundle format, shared by the writer (workstation) and the reader (device). No torch.

- ``spec``: file names, the format version, every manifest key, the model families
- ``reader``: ``Bundle.open`` reads and verifies a bundle
- ``writer``: ``write_bundle`` writes one atomically
- ``pareto``: the stored Pareto set (pareto.json)
- ``theta``: θ's input vocabulary and the role of each quantized matrix

The prose spec is docs/bundle-format.md.
"""
