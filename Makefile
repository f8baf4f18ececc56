# Shardline: `make demo` runs the penguins pipeline end to end; `make test` runs the tests.
SHELL := /bin/bash
ROOT := $(CURDIR)
PYTHON ?= python3
VENV := $(ROOT)/.venv
BIN := $(VENV)/bin
DEMO := $(ROOT)/.demo
DEMO_DATE ?= $(shell date -u -d yesterday +%F)

# One embedded Airflow (SQLite) and one local object store, shared by every target.
export AIRFLOW_HOME := $(DEMO)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(ROOT)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__EXECUTOR := LocalExecutor
export AIRFLOW__SHARDLINE__STORE_URI := $(DEMO)/store
export PYTHONPATH := $(ROOT)
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test airflow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-tests: tests/requirements.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r tests/requirements.txt
	touch $@

$(DEMO)/jwt_secret:
	mkdir -p $(DEMO)
	$(BIN)/python -c "import secrets; print(secrets.token_urlsafe(32))" > $@

$(AIRFLOW_HOME)/airflow.db: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log

demo: $(AIRFLOW_HOME)/airflow.db
	@echo "Running the penguins DAG for $(DEMO_DATE) (airflow dags test; log in $(DEMO)/demo.log)"
	@time ( $(BIN)/airflow dags test penguins $(DEMO_DATE) > $(DEMO)/demo.log 2>&1 \
	  || { tail -n 60 $(DEMO)/demo.log; exit 1; } )
	@$(BIN)/python -m tfjobs.report --log-level WARNING --spec include/penguins.yaml --store $(DEMO)/store \
	  --instances include/penguins_request.json 2>>$(DEMO)/demo.log

# The same DAGs, store and database in the Airflow UI (http://localhost:8080), for one person on this
# machine: Airflow's simple auth manager (docker-compose.yaml, for a team, uses the FAB auth manager).
airflow: $(AIRFLOW_HOME)/airflow.db $(DEMO)/jwt_secret
	AIRFLOW__API_AUTH__JWT_SECRET=$$(cat $(DEMO)/jwt_secret) \
	  AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager \
	  $(BIN)/airflow standalone

test: $(VENV)/.installed-tests
	$(BIN)/python -m pytest -c tests/pytest.ini tests

# Speed targets, each against an anchor measured in the same run (under 15 minutes on 2 cores).
bench: $(VENV)/.installed-tests
	$(BIN)/python -m benchmarks $(BENCH)

clean:
	rm -rf $(DEMO)
