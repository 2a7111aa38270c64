"""swarm layer (see ../shared/DESIGN.md, 'Layers')."""
