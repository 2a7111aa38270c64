"""wire layer (see ../shared/DESIGN.md, 'Layers')."""
