"""Second-order optimizers and minimizers that take their curvature as a LinearOperator."""

__all__: list[str] = []
