-- Hyperparameter studies (tfjobs/tune.py, Optuna's tables) get a database of their own beside
-- Airflow's: both keep an alembic_version table. Runs once, when the data volume is created.
CREATE DATABASE shardline_tuning;
