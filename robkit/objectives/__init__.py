"""Training objectives: teacher-free SSL losses (``dino``, ``swav``, ``mocov2``, with SSLight's
multi-crop re-balancing in ``multicrop``) and RoB distillation losses (``rob``).

Modules are imported on use so that importing one loss does not pull in the others.
"""
