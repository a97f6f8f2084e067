"""Orbax checkpoints of the whole train state {step, params, opt_state} under RUN_DIR/checkpoints.

Uses CheckpointManager + args.StandardSave/StandardRestore, available in orbax-checkpoint 0.5
through 0.12. Restoring into an abstract state with shardings puts every array straight onto
its devices with the right layout.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, run_dir, keep=2, directory=""):
        self.mngr = ocp.CheckpointManager(
            os.path.abspath(directory or os.path.join(run_dir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self):
        return self.mngr.latest_step()

    def save(self, step, state):
        self.mngr.save(step, args=ocp.args.StandardSave(state))

    def restore(self, abstract_state, step=None):
        step = self.latest_step() if step is None else step
        return self.mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def abstract_like(shapes, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restore."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, shardings)
