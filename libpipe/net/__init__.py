"""net layer (see ../shared/DESIGN.md, 'Layers')."""
