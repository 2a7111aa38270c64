"""model layer (see ../shared/DESIGN.md, 'Layers')."""
