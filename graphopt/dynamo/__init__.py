"""The dynamo path: ``torch.compile`` with graphopt's backend, for models ``torch.export`` cannot capture.

:func:`backend` is the ``torch.compile`` backend (forward-stage methods on every captured subgraph);
:class:`DynamoModel` is what ``graphopt.compile(..., capture="dynamo")`` returns (training with the fused
optimizer update, export). Which methods work where is stated in each module's docstring.
"""

from graphopt.dynamo.backend import GraphoptBackend, backend
from graphopt.dynamo.model import DynamoModel

__all__ = ["DynamoModel", "GraphoptBackend", "backend"]
