"""Drop-in replacements for the distillation losses of other libraries, computed by kdkernels'
fused kernels (`kdkernels.integrations.trl`: TRL's GKD loss)."""
