FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY streams ./streams
COPY handlers ./handlers
COPY config ./config
RUN pip install --no-cache-dir . && groupadd --gid 10001 agent \
    && useradd --uid 10001 --gid 10001 agent
# Read-only use of /app: any uid may run it (docker-compose.yml's SRE_UID, for a kubeconfig).
USER 10001:10001
ENV SRE_AGENT_CONFIG=/app/config/agent.yaml
ENTRYPOINT []
CMD ["sre-agent", "run", "--role", "all"]
