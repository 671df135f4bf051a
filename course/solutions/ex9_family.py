"""Exercise 9, a reference solution."""


def settings():
    return dict(router="softmax", select_bias=True, gate_renorm=True, renorm_floor=1e-12, n_shared=2)
