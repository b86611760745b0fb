"""Device profiles: one JSON file per board (RAM, usable RAM, cores, ISA, bandwidth, notes).

Read them with ``coalora.runtime.profiles.load_profile``; ``coalora-run --profile NAME`` plans
for that board instead of probing the machine it runs on.
"""
