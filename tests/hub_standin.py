"""Stand-ins for huggingface_hub in the download tests: LocalHub serves a local folder (root/<repo>/<files>)
as the Hub serves a repository, copying a file into local_dir on its first download only (as the Hub's
cache does) and recording what it copied; OfflineHub is a machine without a network."""
import os
import shutil


class LocalHub:
    def __init__(self, root):
        self.root, self.downloads = str(root), []

    def list_repo_files(self, repo, repo_type=None):
        base = os.path.join(self.root, repo)
        return sorted(os.path.relpath(os.path.join(d, f), base) for d, _, fs in os.walk(base) for f in fs)

    def hf_hub_download(self, repo, filename, repo_type=None, local_dir=None):
        dest = os.path.join(local_dir, filename)
        if not os.path.exists(dest):
            self.downloads.append(filename)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(os.path.join(self.root, repo, filename), dest)
        return dest


class OfflineHub:
    def list_repo_files(self, *args, **kwargs):
        raise ConnectionError("no network")
