"""edgefleet: edge-to-cloud ML fleet manager.

One import namespace for every part: ``edgefleet.agent`` (the device agent),
``edgefleet.cloud`` (the coordinator and the ``fleet`` CLI), ``edgefleet.protos``
(the wire contract), ``edgefleet.models`` (model definitions and runtimes) and
``edgefleet.simulator``. In the repository each part is a top-level folder; this
package links them (``edgefleet/agent -> ../agent``) so the source tree, the tests
and the installed wheel all import the same names.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # this file ships in edgefleet-agent, the part every install has
    __version__ = version("edgefleet-agent")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
