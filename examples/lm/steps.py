"""Train state, its shardings, and the jitted train / eval steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from .model import Transformer
from .optim import make_optimizer
from .parallel import param_specs


def example_batch(cfg, batch):
    b = {"tokens": np.zeros((batch, cfg.seq_len + 1), np.int32)}
    if cfg.model == "encdec":
        b["src"] = np.zeros((batch, cfg.enc_len), np.int32)
        b["src_len"] = np.full((batch,), cfg.enc_len, np.int32)
    return b


def forward(model, params, batch):
    """Mean next-byte cross entropy (nats) of the batch, in float32."""
    tokens = batch["tokens"]
    logits = model.apply({"params": params}, tokens[:, :-1], batch.get("src"), batch.get("src_len"))
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


class Steps:
    """Builds the model, optimizer, state shardings and jitted functions for one mesh."""

    def __init__(self, cfg, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.model = Transformer(cfg)
        self.tx = make_optimizer(cfg)
        self.replicated = NamedSharding(mesh, P())
        ex = example_batch(cfg, cfg.batch_size)
        self.batch_sharding = {k: NamedSharding(mesh, P("data", *[None] * (v.ndim - 1)))
                               for k, v in ex.items()}

        def init_params(rng):
            return self.model.init(rng, ex["tokens"][:, :-1], ex.get("src"), ex.get("src_len"))["params"]

        params_shape = jax.eval_shape(init_params, jax.random.PRNGKey(0))
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params_shape))
        opt_shape = jax.eval_shape(self.tx.init, params_shape)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_shape, param_sh,
                                       transform_non_params=lambda _: self.replicated)
        self.state_sharding = {"step": self.replicated, "params": param_sh, "opt_state": opt_sh}
        self.state_shape = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape,
                            "opt_state": opt_shape}
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params_shape))

        def init_state(rng):
            params = init_params(rng)
            return {"step": jnp.zeros((), jnp.int32), "params": params,
                    "opt_state": self.tx.init(params)}

        def train_step(state, batch):
            loss, grads = jax.value_and_grad(lambda p: forward(self.model, p, batch))(state["params"])
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics = {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                                      for g in jax.tree.leaves(grads)))}
            return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

        self.init_state = jax.jit(init_state, out_shardings=self.state_sharding)
        self.train_step = jax.jit(train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                                  out_shardings=(self.state_sharding, self.replicated),
                                  donate_argnums=0)
        self.eval_step = jax.jit(lambda params, batch: forward(self.model, params, batch),
                                 in_shardings=(param_sh, self.batch_sharding),
                                 out_shardings=self.replicated)

    def put_batch(self, batch):
        return {k: jax.device_put(v, self.batch_sharding[k]) for k, v in batch.items()}
