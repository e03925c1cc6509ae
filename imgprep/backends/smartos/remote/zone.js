// zone: files under a zone root, from the global zone, never leaving that root.
//
// Run as `/usr/node/bin/node -e "$(cat zone.js)" imgprep-zone COMMAND ARGS...` (the
// platform's node, the one vmadm runs on; ES5 only). The zone root is the guest's
// filesystem and a process in the zone may swap any directory for a symlink at any
// moment, so no path is ever used twice: the walk enters one directory entry at a
// time (chdir to a single name, never a path), checks that the directory entered is
// the one it lstat'ed (device and inode) and works relative to it; files are created
// with O_CREAT|O_EXCL|O_NOFOLLOW and their mode set with fchmod on the descriptor.
//
//   write ROOT REL MODE DIRMODE [LINK]  write stdin to ROOT/REL (a new file, MODE), or
//       make it a symlink to LINK; creates missing directories (DIRMODE). Refuses any
//       existing component that is a symlink or not a directory, a target that is a
//       symlink or not a regular file, and a directory swapped while it is entered.
//   present ROOT REL...   prints ROOT/REL for each REL that exists (a dangling symlink
//       counts), resolving symlinks on the way as the zone would: an absolute target
//       from the zone root, `..` never above it.
//   readlink ROOT REL     prints the target of the symlink ROOT/REL (nothing if it is
//       none), its directories resolved like `present`.
//
// Exit 3 with `imgprep: MESSAGE` on stderr when a write is refused.
'use strict';
var fs = require('fs');
var C = fs.constants || require('constants');
var MAX_LINKS = 40;

var argv = process.argv;
var args = argv.slice(argv.indexOf('imgprep-zone') + 1);

function fail(message) {
    process.stderr.write('imgprep: ' + message + '\n');
    process.exit(3);
}

function same(a, b) {
    return a.dev === b.dev && a.ino === b.ino;
}

function lstat(name) {
    try {
        return fs.lstatSync(name);
    } catch (e) {
        if (e.code === 'ENOENT' || e.code === 'ENOTDIR') {
            return null;
        }
        throw e;
    }
}

// Enter the directory entry `name` of the current directory if it is a real directory
// (not a symlink); the directory entered must be the one lstat'ed.
function enter(name, st, shown) {
    process.chdir(name);
    if (!same(fs.statSync('.'), st)) {
        fail(shown + ' changed while imgprep entered it; refusing to write');
    }
}

function enterRoot(root) {
    var st = lstat(root);
    if (st === null || st.isSymbolicLink() || !st.isDirectory()) {
        fail('zone root ' + root + ' is not a directory');
    }
    enter(root, st, 'zone root ' + root);
    return st;
}

function components(rel) {
    var parts = rel.split('/');
    for (var i = 0; i < parts.length; i++) {
        if (parts[i] === '' || parts[i] === '.' || parts[i] === '..') {
            fail('bad path ' + rel);
        }
    }
    return parts;
}

function readStdin() {
    var chunks = [];
    var buf = Buffer.alloc ? Buffer.alloc(65536) : new Buffer(65536);
    for (;;) {
        var n;
        try {
            n = fs.readSync(0, buf, 0, buf.length, null);
        } catch (e) {
            if (e.code === 'EAGAIN') {
                continue;
            }
            if (e.code === 'EOF') {
                break;
            }
            throw e;
        }
        if (n === 0) {
            break;
        }
        chunks.push(Buffer.from ? Buffer.from(buf.slice(0, n)) : new Buffer(buf.slice(0, n)));
    }
    return Buffer.concat(chunks);
}

function write(root, rel, mode, dirmode, link) {
    var data = link ? null : readStdin();
    enterRoot(root);
    var parts = components(rel);
    var name = parts.pop();
    var shown = root;
    for (var i = 0; i < parts.length; i++) {
        shown += '/' + parts[i];
        var st = lstat(parts[i]);
        var created = false;
        if (st === null) {
            fs.mkdirSync(parts[i], 448); // 0700 until it is entered, then DIRMODE
            st = lstat(parts[i]);
            created = true;
        }
        if (st !== null && st.isSymbolicLink()) {
            fail('refusing to write through the symlink ' + shown);
        }
        if (st === null || !st.isDirectory()) {
            fail(shown + ' is not a directory');
        }
        enter(parts[i], st, shown);
        if (created) {
            fs.chmodSync('.', dirmode); // "." is the directory entered, never a link
        }
    }
    shown += '/' + name;
    var target = lstat(name);
    if (target !== null) {
        if (target.isSymbolicLink() || !target.isFile()) {
            fail('refusing to replace ' + shown + ': not a regular file');
        }
        fs.unlinkSync(name); // removes the entry, whatever it has become: never follows it
    }
    if (link) {
        fs.symlinkSync(link, name);
        return;
    }
    var fd;
    try {
        fd = fs.openSync(name, C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW, 384); // 0600
    } catch (e) {
        fail('cannot create ' + shown + ': ' + e.code);
    }
    for (var off = 0; off < data.length;) {
        off += fs.writeSync(fd, data, off, data.length - off, null);
    }
    fs.fchmodSync(fd, mode);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
}

// Walk the directories `queue` from the current directory as the zone would resolve
// them (symlinks followed inside the zone root); false if one is missing or not a
// directory.
function walk(root, rootSt, queue) {
    var links = 0;
    while (queue.length > 0) {
        var c = queue.shift();
        if (c === '' || c === '.') {
            continue;
        }
        if (c === '..') {
            if (!same(fs.statSync('.'), rootSt)) {
                process.chdir('..');
            }
            continue;
        }
        var st = lstat(c);
        if (st === null) {
            return false;
        }
        if (st.isSymbolicLink()) {
            if (++links > MAX_LINKS) {
                return false;
            }
            var to = fs.readlinkSync(c);
            if (to.charAt(0) === '/') {
                enter(root, rootSt, 'zone root ' + root);
            }
            queue = to.split('/').concat(queue);
            continue;
        }
        if (!st.isDirectory()) {
            return false;
        }
        process.chdir(c);
        if (!same(fs.statSync('.'), st)) {
            return false; // swapped while entered: answer "absent" rather than look elsewhere
        }
    }
    return true;
}

// The last component of REL, in its directory resolved inside the zone root, or null.
function locate(root, rel) {
    var rootSt = enterRoot(root);
    var parts = rel.split('/').filter(function (p) {
        return p !== '';
    });
    var name = parts.pop();
    if (name === undefined || name === '.' || name === '..') {
        return null;
    }
    return walk(root, rootSt, parts) ? name : null;
}

process.on('uncaughtException', function (e) {
    fail(e.message); // one line (e.g. a name created by the zone between lstat and mkdir)
});

var command = args[0];
if (command === 'write' && (args.length === 5 || args.length === 6)) {
    write(args[1], args[2], parseInt(args[3], 8), parseInt(args[4], 8), args[5] || '');
} else if (command === 'present' && args.length >= 2) {
    var out = [];
    for (var i = 2; i < args.length; i++) {
        var name = locate(args[1], args[i]);
        if (name !== null && lstat(name) !== null) {
            out.push(args[1] + '/' + args[i] + '\n');
        }
    }
    process.stdout.write(out.join(''));
} else if (command === 'readlink' && args.length === 3) {
    var last = locate(args[1], args[2]);
    var st = last === null ? null : lstat(last);
    if (st !== null && st.isSymbolicLink()) {
        process.stdout.write(fs.readlinkSync(last) + '\n');
    }
} else {
    process.stderr.write('usage: imgprep-zone write|present|readlink ROOT ...\n');
    process.exit(2);
}
