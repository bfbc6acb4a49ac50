.PHONY: demo test drills bench protos
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
drills:
	bash bench/drills.sh
bench:
	bash scripts/setup.sh && .venv/bin/python bench/throughput.py
protos:
	.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. serve/protos/raystream.proto
