"""cnnexp's SLURM launcher for Hydra: `cnnexp -m hydra/launcher=slurm ...`.

Hydra accepts launcher classes only from the `hydra_plugins` namespace
package; conf/hydra/launcher/slurm.yaml names slurm_launcher.SlurmLauncher.
The SLURM-side helpers it uses live in cnnexp/sweep/slurm.py.
"""
