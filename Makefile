# Kurier: `make run` starts everything locally; `make test` sets up and runs all tests.
.PHONY: setup build run test bench fmt clean

setup:
	scripts/setup.sh

build: setup
	cargo build --release --workspace --bins --examples

run: build
	scripts/run-local.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh

fmt:
	cargo fmt --all

clean:
	scripts/broker.sh stop .state/broker
	scripts/broker.sh stop .state/test-broker
	cargo clean
