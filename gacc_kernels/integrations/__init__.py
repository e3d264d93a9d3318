"""Framework plug-ins (HF Trainer, Accelerate, Lightning, Lightning Fabric): thin glue that translates a
framework's events into GradAccumulator's few calls. The core never imports a framework."""
