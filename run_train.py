"""Train a YOLOv5 detector: ``python run_train.py model=yolov5s data=coco128`` (the ``yolo-train`` command)."""
from yolo.run_train import main

if __name__ == "__main__":
    main()
