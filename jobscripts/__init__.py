"""Job-script templates, and each HPC machine's env.sh (`envs` links to the repository's envs/):
package data, so that a pip-installed exaforce renders jobs that run without a checkout."""
