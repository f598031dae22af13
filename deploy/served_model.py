"""The file MLflow builds the served model from ("models from code": nothing is pickled).

``deploy.packaging`` logs this file as the pyfunc ``python_model``; at load time MLflow runs it
with the logged ``code_paths`` (the ``detr`` and ``deploy`` packages) on ``sys.path``.
"""

import mlflow

from deploy.pyfunc_model import DetrPythonModel

mlflow.models.set_model(DetrPythonModel())
