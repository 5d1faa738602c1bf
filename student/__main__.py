"""``python -m student``: the same as the ``student`` console script."""

from student.cli import main

if __name__ == "__main__":
    main()
