# Placeholder until the submission stage lands: the image serves `onegpu serve` on port 80.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir -e .
EXPOSE 80
CMD ["onegpu", "serve", "--host", "0.0.0.0", "--port", "80"]
