"""placement layer (see ../shared/DESIGN.md, 'Layers')."""
