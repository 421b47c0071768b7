# telerad: one image for the hub and the station gateway (the command picks the role).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY telerad ./telerad
COPY dicom_gateway ./dicom_gateway
COPY reading_queue ./reading_queue
COPY viewer_api ./viewer_api
COPY sample_studies ./sample_studies
RUN pip install '.[postgres]' && useradd --system --uid 10001 --home /data telerad \
    && mkdir -p /data && chown telerad /data
USER telerad
VOLUME ["/data"]
EXPOSE 8100 11112 11113
ENTRYPOINT ["telerad"]
CMD ["--help"]
