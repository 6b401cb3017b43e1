"""The code MLflow runs to build the pyfunc model (MLflow's "models from code"), instead of unpickling an object.

:func:`yolo.tracking.pyfunc.save_model` hands this file to MLflow, which copies it into the model folder and runs it
when the model is loaded: the model is the class :class:`yolo.tracking.pyfunc.YoloDetector` of the installed
``yolo``, nothing is unpickled. Not imported by the package.
"""

from mlflow.models import set_model

from yolo.tracking.pyfunc import YoloDetector

set_model(YoloDetector())
