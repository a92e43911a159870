"""The names of the files in a run folder, defined once. The trainer writes the run's own files, the jobs
(`integrations.job`) the exports; `integrations.run_folder` (locking, clean-up) and every reader use these."""

#: the training config, the refinement config, the loss history, the checkpoints
CONFIG = "config.json"
REFINE = "refine.json"
HISTORY = "history.json"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "checkpoints/last.pt"
#: the landscape stage (z_mode "continuous"), written after training
LANDSCAPE = "landscape.pt"
#: the run's references (`refine.references`): its final class maps, written after the refinement of training
REFERENCES = "references.pt"
#: the exports
PREDICTIONS = "predictions.npz"
PARTICLES_STAR = "particles.star"
PARTICLES_CS = "particles.cs"
CLASSES = "classes.json"
LOSS_PLOT = "loss.png"
MAPS = "maps"
#: the CLI's log of a run
TRAIN_LOG = "train.log"
