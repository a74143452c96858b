"""tid-d2: Task Integration Distillation for detectron2."""
