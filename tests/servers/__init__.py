"""Real servers on 127.0.0.1 for transport tests: sshd, Samba, pyftpdlib, vsftpd, a proxy."""
