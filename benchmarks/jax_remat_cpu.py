"""Does `jax.checkpoint` lower the compiled step's memory on this machine?

    python benchmarks/jax_remat_cpu.py

No bert4keras code: eight residual tanh-MLP blocks (batch 4, length 512,
width 768), gradient of a scalar, compiled with and without `jax.checkpoint`
around each block. Prints XLA's temporary buffer size and the number of
matrix products in the compiled program (more products: the forward pass is
recomputed in the backward one). Used in benchmarks/README.md to tell a
property of XLA's CPU backend from a bert4keras bug.
"""
import jax
import jax.numpy as jnp
import numpy as np

LAYERS, BATCH, LENGTH, WIDTH = 8, 4, 512, 768


def block(w, x):
    h = jnp.tanh(x @ w[0])
    h = jnp.tanh(h @ w[1]) * h
    return x + jnp.tanh(h @ w[2])


def loss(remat):
    def f(weights, x):
        for w in weights:
            x = (jax.checkpoint(block) if remat else block)(w, x)
        return (x**2).sum()

    return f


def main():
    rng = np.random.default_rng(0)
    weights = [[jnp.asarray(rng.normal(size=(WIDTH, WIDTH)).astype("float32") * 0.02) for _ in range(3)]
               for _ in range(LAYERS)]
    x = jnp.asarray(rng.normal(size=(BATCH, LENGTH, WIDTH)).astype("float32"))
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; one (batch, length, width) "
          f"activation is {BATCH * LENGTH * WIDTH * 4 / 2**20:.0f} MiB")
    for remat in (False, True):
        compiled = jax.jit(jax.grad(loss(remat))).lower(weights, x).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        products = compiled.as_text().count(" dot(")
        print(f"jax.checkpoint {'on ' if remat else 'off'}: temp buffers {temp:.0f} MiB, {products} matrix products")


if __name__ == "__main__":
    main()
