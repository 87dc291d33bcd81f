"""A local Cloud Storage emulator for the gs:// tests, on the loopback interface only.

`python tests/_gcs.py PORT` serves gcp-storage-emulator (PyPI) in memory on 127.0.0.1:PORT
with one bucket, `bkt`. The emulator leaves out the x-goog-generation header of a media
download, which TensorStore's GCS driver reads to make its conditional writes (the OCDBT
manifest of every Orbax checkpoint); it is added here, from the object's own record.
`emulator()` starts that process and stops it; `environment(url)` is what a client process
needs to talk to it and to nothing else (no credentials, no metadata server).
"""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

BUCKET = 'bkt'


def environment(url: str) -> dict[str, str]:
  """Variables that point gcsfs (epath) and TensorStore (Orbax) at the emulator."""
  return {
      'STORAGE_EMULATOR_HOST': url,  # gcsfs: this endpoint, anonymous
      'TENSORSTORE_GCS_HTTP_URL': url,  # TensorStore's GCS driver: this endpoint
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',  # TensorStore: no credential lookup
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # gcsfs: no bucket-layout API call
      'NO_GCE_CHECK': 'True',  # google-auth: never probe a metadata server
  }


@contextlib.contextmanager
def emulator():
  """Yields the URL of a fresh in-memory emulator on 127.0.0.1 (stopped afterwards)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  log = tempfile.TemporaryFile()  # a log line per request: a pipe nobody reads would fill
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port)],
                          stdout=subprocess.DEVNULL, stderr=log)
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          log.seek(0)
          raise RuntimeError('the storage emulator did not start: '
                             + log.read().decode(errors='replace')[-2000:]) from None
        time.sleep(0.1)
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def _serve(port: int) -> None:
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    except Exception:  # pylint: disable=broad-except  # not found: the 404 stands
      return
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj['metageneration']

  objects.download = download_with_generation  # objects.get (`alt=media`) calls it by name
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == '__main__':
  _serve(int(sys.argv[1]))
