# The bundle's __main__: checks the interpreter before importing anything else.
# Kept to syntax every Python can parse, so an old interpreter gets our message, not a
# SyntaxError from a later module.
import sys


def _main():
    args = sys.argv[1:]
    if not args:
        sys.stderr.write("usage: bundle.pyz launch MAJOR.MINOR | engine | relay SOCKET\n")
        sys.exit(2)
    cmd = args[0]
    if cmd == "launch":
        want = args[1] if len(args) > 1 else ""
        have = "%d.%d" % sys.version_info[:2]
        if want and want != have:
            sys.stdout.write(
                'SSHPAR-ERROR {"kind": "version", "message": "Python %s", "have": "%s", '
                '"executable": "%s"}\n' % (sys.version.split()[0], have,
                                            sys.executable.replace("\\", "/")))
            sys.stdout.flush()
            sys.exit(3)
        from sshpar._engine import launcher
        launcher.main(args[2:])
    elif cmd == "nanny":
        from sshpar._engine import nanny
        nanny.main()
    elif cmd == "engine":
        from sshpar._engine import daemon
        daemon.main()
    elif cmd == "relay":
        from sshpar._engine import relay
        relay.main(args[1:])
    else:
        sys.stderr.write("unknown command %r\n" % cmd)
        sys.exit(2)


_main()
